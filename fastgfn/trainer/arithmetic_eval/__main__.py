from fastgfn.trainer.arithmetic_eval.cli import main

main()

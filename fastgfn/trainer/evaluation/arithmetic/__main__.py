from fastgfn.trainer.evaluation.arithmetic.cli import main

main()

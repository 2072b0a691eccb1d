from fastgfn.trainer.evaluation.reasoning.cli import main

main()

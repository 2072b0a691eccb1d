from fastgfn.trainer.infilling_eval.cli import main

main()

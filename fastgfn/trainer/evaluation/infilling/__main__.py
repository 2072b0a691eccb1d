from fastgfn.trainer.evaluation.infilling.cli import main

main()

from fastgfn.trainer.evaluation.continuation.cli import main

main()

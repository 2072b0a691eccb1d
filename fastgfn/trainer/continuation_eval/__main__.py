from fastgfn.trainer.continuation_eval.cli import main

main()

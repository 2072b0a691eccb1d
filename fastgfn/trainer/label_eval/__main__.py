from fastgfn.trainer.label_eval.cli import main

main()

from cifar_exp.cli import main

main(prog_name="cifar-exp")

from cifar_exp.cli import run

run()

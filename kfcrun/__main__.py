from kfcrun.cli import main

main()

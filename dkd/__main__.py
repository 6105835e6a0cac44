from dkd.cli import main

main()

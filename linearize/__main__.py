from linearize.cli import main

main()

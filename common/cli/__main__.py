from fedrec.common.cli import main

main()

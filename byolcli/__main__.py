from byolcli.cli import main

main()

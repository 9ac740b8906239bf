from cake.cli import main

main()

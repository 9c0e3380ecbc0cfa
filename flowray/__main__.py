from flowray.cli import main

main()

from probecache.cli import main

main()

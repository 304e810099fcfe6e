from cutmix_pl.cli import main
main()

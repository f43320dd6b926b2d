from jobmesh.cli import main

main()

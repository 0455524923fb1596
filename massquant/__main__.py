from massquant.cli.main import main

raise SystemExit(main())

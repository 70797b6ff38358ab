from medxfer.cli import main

raise SystemExit(main())

from phasestream.apps.cli.main import main

raise SystemExit(main())

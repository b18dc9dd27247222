from phasestream.cli import main

raise SystemExit(main())

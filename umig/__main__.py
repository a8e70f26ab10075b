from umig.cli import main

raise SystemExit(main())

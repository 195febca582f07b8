from aeserve.cli import main

raise SystemExit(main())

from rotary.cli import main

raise SystemExit(main())

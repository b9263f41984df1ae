from minirlhf.cli import main

raise SystemExit(main())

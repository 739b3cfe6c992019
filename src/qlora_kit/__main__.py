"""`python -m qlora_kit` == the `qlora-kit` console script."""
from qlora_kit.cli import main

raise SystemExit(main())

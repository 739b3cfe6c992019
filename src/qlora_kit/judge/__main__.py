"""`python -m qlora_kit.judge replay ...`: the judge replay without the main CLI."""
import sys

from qlora_kit.judge.replay import main

sys.exit(main())

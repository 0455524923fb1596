import sys

from massquant.benchmarks.bench import main

sys.exit(main())

import sys

from streams.sink.main import main

sys.exit(main())

"""Runnable entry point for `clipline embed` (cron, Airflow, spark-submit): python jobs/embed.py KEY=VALUE ..."""

import os
import sys

if __name__ == "__main__":
    try:
        import pipeline  # noqa: F401
    except ImportError:  # running from a checkout without installing (e.g. spark-submit --py-files)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pipeline.cli.main import main

    sys.exit(main(["embed", *sys.argv[1:]]))

"""The work behind each `paceray` subcommand (imported only when that subcommand runs)."""

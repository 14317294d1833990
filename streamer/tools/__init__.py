"""The `streamer` command and the tools behind it: demo, replay (backtest), produce, plots."""

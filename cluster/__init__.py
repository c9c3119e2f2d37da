"""Where fanned-out work runs: the dask clusters that extract's shards and train's sweep shares go to."""

"""The trajectory videos: how one is drawn, the shards that hold them, and the dataset a run reads."""

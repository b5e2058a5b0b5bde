"""What both halves share: what a corpus shard is and what a scored batch is."""

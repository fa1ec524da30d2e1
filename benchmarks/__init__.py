"""Side-by-side benchmarks of procshare against its peers (`make bench`)."""

"""Everything that reads the outside world: downloads (pinned URLs, the Hub), the sources'
published prompt sets, and the safety check every model folder passes before it is loaded.
"""

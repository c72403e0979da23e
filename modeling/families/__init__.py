"""Model families: what the stages know about a kind of checkpoint (see `base.Family`)."""

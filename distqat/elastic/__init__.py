"""Elastic training: process plumbing (:mod:`.dist`), forming a round (:mod:`.round`),
resuming across rounds (:mod:`.restore`), the job's history (:mod:`.history`), and one
worker's round from start to end (:mod:`.worker`)."""

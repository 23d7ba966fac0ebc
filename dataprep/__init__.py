"""pipelora.dataprep"""

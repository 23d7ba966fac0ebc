"""pipelora.trainer"""

"""pipelora.workflow"""

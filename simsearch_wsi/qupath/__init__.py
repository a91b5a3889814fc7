"""qupath"""

"""The registry service: immutable, verified model versions with aliases, lineage, model
cards, approvals and an audit trail."""

"""The job stores: one specification of the contract, held by each store."""

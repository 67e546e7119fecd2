"""A package of the user's own (not installed) whose modules refer to each other, as real projects' do."""

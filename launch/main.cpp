// Placeholder: the hydistill CLI is being written.
int main() { return 1; }

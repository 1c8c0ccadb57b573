// hydistill: the command-line entry point (launch/commands.h does the work).
#include <iostream>
#include <string>
#include <vector>

#include "launch/commands.h"

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(true);
  const std::vector<std::string> args(argv + 1, argv + argc);
  return hyd::hydistill_main(args, std::cout, std::cerr);
}

from mcp_codeexec.cli import main

main()

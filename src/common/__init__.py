"""What every package of the project stands on, importing none of them: files written whole
(`files`), the fixes an error line prints (`messages`) and the prompt file, a trained method as a
small portable file (`prompt_file`)."""

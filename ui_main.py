"""The Streamlit script that app.py serves: page settings and navigation, nothing else. Each page calls
ui.setup() itself (sidebar, server banner), so a deep link to any page gets the same frame."""

import streamlit as st

import ui

ui.page_config()
st.navigation(ui.navigation_pages()).run()
